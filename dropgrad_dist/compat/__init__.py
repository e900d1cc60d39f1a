"""Drop-in modules for the users of peer libraries: their documented code runs with only the import changed.

``dropgrad_dist.compat.torch_clip``: torch-clip's ``ClippedSGD``, ``Restarter`` and property holders.
"""
