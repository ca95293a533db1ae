"""The napari face of napari-omniseg: dock widgets over the Qt-free core.

Each module is imported only when napari opens its widget (see ``napari.yaml``), so
loading the plugin does not import torch.
"""
