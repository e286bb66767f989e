"""Layer 1, the graph: one UNet call as a ``torch.fx`` graph, and its cuts.

Capture (:mod:`.capture`, on a twin of the module tree: :mod:`.twin`, with module stacks
resolved by identity: :mod:`.stacks`), walks over the graph (:mod:`.nodes`), region labels
(:mod:`.regions`), the encoder and deep cuts (:mod:`.cuts`, :mod:`.deep`), the split into a
key-step part and an every-step part (:mod:`.split`), what a capture depends on
(:mod:`.fingerprint`, :mod:`.purity`) and the per-UNet capture cache with its call gate
(:mod:`.cache`, :mod:`.calls`). Imports only torch.
"""
