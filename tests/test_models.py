import json
import shutil

import torch

from fedlora.config import ModelConfig
from fedlora.models import MeanPoolClassifier, load_model


def test_sentence_transformer_checkpoints_get_a_mean_pooling_head(tiny_bert_dir, tmp_path):
    st_dir = tmp_path / "st"
    shutil.copytree(tiny_bert_dir, st_dir)
    (st_dir / "1_Pooling").mkdir()
    (st_dir / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    loaded = load_model(ModelConfig(name=str(st_dir)), num_labels=3, seed=0)
    assert isinstance(loaded.model, MeanPoolClassifier)
    assert loaded.head == ["classifier.bias", "classifier.weight"]
    ids = torch.tensor([[101, 2000, 2001, 102, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    out = loaded.model(input_ids=ids, attention_mask=mask, labels=torch.tensor([1]))
    # padding does not change the pooled features: same logits with the pads cut off
    short = loaded.model(input_ids=ids[:, :4], attention_mask=mask[:, :4])
    torch.testing.assert_close(out.logits, short.logits)
    assert out.loss.item() > 0
    # a plain checkpoint keeps the model's own classification head; "cls" forces it
    assert not isinstance(load_model(ModelConfig(name=str(tiny_bert_dir)), 3, 0).model, MeanPoolClassifier)
    forced = load_model(ModelConfig(name=str(st_dir), pooling="cls"), 3, 0)
    assert not isinstance(forced.model, MeanPoolClassifier) and forced.head == ["classifier.bias", "classifier.weight"]
    # the head is seeded: the same seed builds the same head
    again = load_model(ModelConfig(name=str(st_dir)), num_labels=3, seed=0)
    assert torch.equal(again.model.classifier.weight, loaded.model.classifier.weight)
