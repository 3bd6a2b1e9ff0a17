"""Face backbones by name (IResNet, MobileFaceNet, ViT, a BatchNorm-free PlainNet), state_dict-compatible with
insightface arcface_torch.

Importing the network modules registers their names with the registry."""

from partial_fc.backbones.iresnet import IResNet
from partial_fc.backbones.mobilefacenet import MobileFaceNet
from partial_fc.backbones.plain import PlainNet
from partial_fc.backbones.registry import get_model, list_models, register_model
from partial_fc.backbones.vit import VisionTransformer

__all__ = ["IResNet", "MobileFaceNet", "PlainNet", "VisionTransformer", "get_model", "list_models", "register_model"]
