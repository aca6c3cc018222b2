"""cmbbench: a standardized benchmark for cerebral microbleed (CMB) detection on brain MRI.

The library is organised one module per concept:

- :mod:`cmbbench.geometry`   voxel <-> world (RAS mm) conversions through the affine
- :mod:`cmbbench.model`      dataclasses for scans, reference lesions and predicted candidates
- :mod:`cmbbench.nifti`      NIfTI reading/writing with one-line errors
- :mod:`cmbbench.dataset`    the harmonized dataset layout (reader and writer)
- :mod:`cmbbench.harmonize`  masks -> instances, points -> derived masks, probability -> candidates
- :mod:`cmbbench.matching`   named, versioned matching rules
- :mod:`cmbbench.metrics`    pure metric functions on the per-lesion/per-candidate table
- :mod:`cmbbench.statistics` bootstrap confidence intervals over scans
- :mod:`cmbbench.predictions` reading predictions folders
- :mod:`cmbbench.scoring`    score one case, many cases, a folder
- :mod:`cmbbench.cli`        the ``cmbbench`` command line
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
