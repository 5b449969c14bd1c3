"""The executable model: host mm + KVM (with async page faults) + VMM + guest kernel.

``System(scenario, design, policy, sink=None, **params)`` is the transition system
(shared by the simulator and the checker; ``design`` a shipped design's name, a design
file's path or a ``Design``: faultline/model/designs/, docs/designs.md); ``simulate()``
runs it once and returns an ``Outcome``.
"""

from faultline.model.simulate import simulate
from faultline.model.system import System

__all__ = ["System", "simulate"]
