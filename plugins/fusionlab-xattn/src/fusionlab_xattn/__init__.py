"""An example fusionlab plugin: a Flamingo-style cross-attention fusion backbone.

Installing this distribution registers `cross_attention` in the entry-point group
`fusionlab.architectures`; `fusionlab plugins` lists it.
"""

from fusionlab_xattn.model import CrossAttentionFusion

__all__ = ["CrossAttentionFusion"]
__version__ = "0.1.0"
