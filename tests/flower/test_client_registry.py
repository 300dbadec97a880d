"""The server's client registry on its own: partition ids range-checked, the first claim keeps a client,
budgets clamped, example counts the server's, clients bound to node keys; the operator's registry file."""

import logging

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlora.errors import ConfigError
from fedlora.flower.registry import Allowed, ClientRegistry, Refuse, load_registry, normalise_public_key


def make_key() -> tuple[bytes, str]:
    """(the key as Flower holds it: PEM, the same key as an OpenSSH line: what operators paste)."""
    public = ec.generate_private_key(ec.SECP384R1()).public_key()
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    ssh = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return pem, ssh


def open_registry():
    return ClientRegistry(num_examples=[10, 20, 30, 40], budgets=[2, 4, 8, 8], global_rank=8)


def test_out_of_range_ids_are_refused_and_budgets_clamped_into_1_to_global_rank(caplog):
    reg = open_registry()
    with caplog.at_level(logging.INFO, logger="fedlora"):
        assert reg.claim(5, b"", 4, None, {5}).reason is Refuse.OUT_OF_RANGE
        assert reg.claim(6, b"", -1, None, {6}).reason is Refuse.OUT_OF_RANGE
        assert reg.claim(7, b"", 0, 0, {7}) is None
        assert reg.claim(8, b"", 1, 10**6, {8}) is None
        assert reg.claim(9, b"", 2, None, {9}) is None  # no budget given: the config's
    assert reg.budgets[:3] == [1, 8, 8] and reg.holders.keys() == {0, 1, 2}
    assert "node 5 refused: out_of_range (partition-id 4 is not in [0, 4))" in caplog.text
    assert "node 7 (client 0): budget 0 clamped to 1" in caplog.text
    assert "node 8 (client 1): budget 1000000 clamped to 8" in caplog.text


def test_a_refused_slot_taken_claim_never_becomes_a_holder_later():
    reg = open_registry()
    assert reg.claim(5, b"k5", 0, 2, {5, 6}) is None
    assert reg.claim(6, b"k6", 0, 8, {5, 6}).reason is Refuse.SLOT_TAKEN
    # node 5 blinks offline: node 6 asks again, under its id or from a new id with its key
    assert reg.claim(6, b"k6", 0, 8, {6}).reason is Refuse.SLOT_TAKEN
    assert reg.claim(16, b"k6", 0, 8, {16}).reason is Refuse.SLOT_TAKEN
    assert reg.node_of(0) == 5 and reg.budgets[0] == 2
    assert reg.claim(5, b"k5", 0, 2, {5, 6}) is None and reg.node_of(0) == 5  # the owner keeps it
    assert reg.claim(7, b"k7", 0, 4, {7}) is None and reg.node_of(0) == 7  # a node never refused, owner gone


def test_the_same_key_under_a_new_node_id_gets_its_client_back_at_once():
    reg = open_registry()
    reg.claim(5, b"key-a", 1, 4, {5})
    assert reg.claim(11, b"key-a", 1, 4, {5, 11}) is None and reg.node_of(1) == 11  # old id still listed


def test_a_budget_below_the_operators_floor_is_refused_and_cannot_lower_a_common_rank(caplog):
    reg = ClientRegistry(num_examples=[10, 20, 30], budgets=[4, 4, 8], global_rank=8, floor=4)
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        assert reg.claim(5, b"", 0, 1, {5}).reason is Refuse.BELOW_FLOOR
        assert reg.claim(6, b"", 1, None, {6}) is None and reg.claim(7, b"", 2, 6, {7}) is None
    assert 0 not in reg.holders and min(reg.budgets) == 4  # FedIT's common rank stays at the floor
    assert "node 5 refused: below_floor (budget 1 for client 0 is below the run's floor 4 (run config " \
           "min-budget))" in caplog.text
    assert reg.claim(8, b"", 0, 4, {8}) is None  # the refusal is about the budget, not the client


def test_example_counts_are_the_servers_and_the_registry_binds_clients_to_keys():
    (k0, _), (k1, _), (k2, _) = make_key(), make_key(), make_key()
    allowed = {0: Allowed(0, budget=4, num_examples=500, public_key=k0), 1: Allowed(1, budget=2, public_key=k1),
               3: Allowed(3, budget=8, node_id=77)}
    reg = ClientRegistry([10, 20, 30, 40], [8, 8, 8, 8], 8, allowed)
    assert reg.num_examples == [500, 20, 30, 40]  # the file's number, else the split's
    assert reg.claim(5, k0, 0, 8, {5}) is None and reg.budgets[0] == 4  # clamped to its cap
    assert reg.claim(6, k2, 1, 2, {6}).reason is Refuse.NOT_ALLOWED  # client 1 is k1's
    assert reg.claim(6, k2, 2, 2, {6}).reason is Refuse.NOT_ALLOWED  # not listed
    assert reg.claim(7, k1, 0, 2, {5, 7}).reason is Refuse.NOT_ALLOWED  # another's client, even offline
    assert reg.claim(8, b"", 3, None, {8}).reason is Refuse.NOT_ALLOWED and reg.claim(77, b"", 3, None, {77}) is None


def write(tmp_path, text):
    p = tmp_path / "clients.toml"
    p.write_text(text)
    return p


def test_the_registry_file_takes_openssh_or_pem_keys_and_node_ids(tmp_path):
    (pem, ssh), (pem2, _) = make_key(), make_key()
    p = write(tmp_path, f'[[client]]\npartition_id = 1\npublic_key = "{ssh}"\nbudget = 4\nnum_examples = 12\n\n'
                        f'[[client]]\npartition_id = 0\npublic_key = """{pem2.decode()}"""\nbudget = 8\n\n'
                        '[[client]]\npartition_id = 2\nnode_id = 123\nbudget = 2\n')
    allowed = load_registry(p, num_clients=3, global_rank=8)
    assert allowed[1] == Allowed(1, 4, 12, pem, None) and allowed[0].public_key == pem2
    assert allowed[2] == Allowed(2, 2, None, b"", 123)
    assert normalise_public_key(ssh) == normalise_public_key(pem.decode()) == pem


@pytest.mark.parametrize("body, error", [
    ("[[client]]\npartition_id = 0\nnode_id = 1\nbudget = 4\nweight = 3\n", "client[0]: unknown key 'weight'"),
    ("[[client]]\npartition_id = 3\nnode_id = 1\nbudget = 4\n", "client[0].partition_id: expected an integer [0, 2]"),
    ("[[client]]\npartition_id = 0\nnode_id = 1\nbudget = 9\n", "client[0].budget: expected an integer [1, 8]"),
    ("[[client]]\npartition_id = 0\nnode_id = 1\nbudget = 2.5\n", "client[0].budget: expected an integer"),
    ("[[client]]\npartition_id = 0\nbudget = 4\n", "client[0]: give exactly one of public_key and node_id"),
    ('[[client]]\npartition_id = 0\npublic_key = "ssh-rsa AAAA"\nbudget = 4\n', "client[0].public_key"),
    ("[[client]]\npartition_id = 0\nnode_id = 1\nbudget = 4\n[[client]]\npartition_id = 0\nnode_id = 2\nbudget = 4\n",
     "client[1].partition_id: client 0 is listed twice"),
    ("[[client]]\npartition_id = 0\nnode_id = 1\nbudget = 4\n[[client]]\npartition_id = 1\nnode_id = 1\nbudget = 4\n",
     "client[1]: the same node is listed for two clients"),
    ("budget = 4\n", "expected only [[client]] tables"),
])
def test_a_bad_registry_file_is_a_config_error_naming_the_entry(tmp_path, body, error):
    with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("]", r"\]")):
        load_registry(write(tmp_path, body), num_clients=3, global_rank=8)
