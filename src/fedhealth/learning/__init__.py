"""Learning: model recipes, server strategies, metrics.

Recipes are pure numpy functions of (parameters, data, seed); strategies turn the clients' updates into the
next global model. Nothing here knows about HTTP or the database.
"""

__all__: list[str] = []
