"""Monte Carlo sampling: the sampler and everything that decides how it runs.

* ``sampler``: ``MCSampler``, the passes of a Keras model with only its dropout layers sampled;
* ``dropout``: which dropout layers are sampled and how a per-row mask is drawn;
* ``graph_split``: the mask-independent prefix and the stochastic tail, and their activation
  bytes per row;
* ``memory``: the memory budget turned into rows run at once, and balanced chunks of rows;
* ``precision`` and ``probe``: whether bfloat16 can run here (the CPU, oneDNN, a probe run);
* ``stopping``: adaptive passes (``--passes auto``), when to stop sampling an image.

Nothing is imported here: ``memory``, ``precision`` and ``stopping`` stay free of TensorFlow.
"""
