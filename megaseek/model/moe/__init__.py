"""DeepSeekMoE: router (router.py), experts (experts.py), all-to-all dispatch (dispatch.py), balancing
(balance.py) and the layer that composes them (layer.py)."""
