"""Serving a compiled ``server/`` folder over the Open Inference Protocol (the ``[serve]`` extra).

``interface`` (no serving engine needed) says what a folder serves; ``settings``, ``runtime`` and
``launcher`` run it on MLServer and are imported only by the serving process
(``eecompile serve``); the client is :mod:`eecompile.remote`, the Triton exporter
:mod:`eecompile.triton`.
"""
