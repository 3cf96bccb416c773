"""``mpvg analyze``'s library: token/PE correlation per layer, heatmaps, last-LayerNorm statistics and
position-correlation maps of trained models, written as PNG, JSON and Markdown.

May import ops, layers, models and train; needs matplotlib (the ``[train]`` extra).
"""
