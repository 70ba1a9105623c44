"""RD4AD model: teacher (frozen ResNet) -> bottleneck (OCBE) -> student (decoder)."""
from .arch import ARCH_NAMES as ARCHS
from .convert import convert_reference_state_dicts
from .rd4ad import RD4AD, build_rd4ad
from .teacher import TeacherWeightsError

__all__ = ["ARCHS", "RD4AD", "TeacherWeightsError", "build_rd4ad", "convert_reference_state_dicts"]
