"""fusionlab: native multimodal models (early fusion, late fusion, mixture of experts) with Lightning."""

__version__ = "0.1.0"
