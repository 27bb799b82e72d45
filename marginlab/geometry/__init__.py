"""The geometry of what a head learns, one job per module (import the module you need):

- ``stats``: the numbers (feature norms, target / nearest non-target angles, margin violations,
  pairwise class angles), from the cosines a head already made;
- ``store``: the saved data of each evaluated epoch, ``geometry/epoch_XXX.npz``: its schema and I/O;
- ``render``: figures from that saved data (what ``marginlab plot`` uses, with ``store``);
- ``probe``: the training-time ``GeometryProbe`` (a bounded validation sample per epoch -> histograms,
  scalars, npz, figures), with ``figure_pool`` (figures drawn on a background thread) and
  ``projector`` (TensorBoard's embedding projector).
"""
