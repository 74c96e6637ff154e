"""torch.nn.Modules over the fused ops: the six ReFT interventions and the orthonormal R."""
from .interventions import (BY_PYREFT_NAME, INTERVENTIONS, ConsReFT, DiReFT, LobiReFT, LoReFT, NoReFT,
                            OrthoDiReFT, ReftIntervention)
from .orthonormal import Orthonormal, compute_batched, orthonormal_batch, orthonormality_error

__all__ = ["BY_PYREFT_NAME", "INTERVENTIONS", "ConsReFT", "DiReFT", "LoReFT", "LobiReFT", "NoReFT", "OrthoDiReFT",
           "Orthonormal", "ReftIntervention", "compute_batched", "orthonormal_batch", "orthonormality_error"]
