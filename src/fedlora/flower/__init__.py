"""fedlora on Flower: the same strategies, carried by Flower's message API across machines.

``server_app.app`` and ``client_app.app`` are the Flower apps; ``codec`` is the only
module that knows Flower's record keys; ``inprocess.InProcessGrid`` runs both apps in
one process (tests, debugging).
"""
