"""Reimplemented published CMB detection methods, installed as the ``cmbbench_baselines`` package.

Each module is a method plugin (:class:`cmbbench.methods.api.Method`) registered in the
``cmbbench.methods`` entry-point group by cmbbench's own ``pyproject.toml``.
"""
