"""``python -m app`` from a checkout: the studio (installed, the same is ``shira studio``)."""
