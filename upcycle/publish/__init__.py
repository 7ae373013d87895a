"""Publishing: the model card rendered from upcycle.json (card.py) and the push to the Hub (hub.py)."""
