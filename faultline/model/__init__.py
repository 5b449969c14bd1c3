"""The executable model: host mm + KVM (with async page faults) + VMM + guest kernel.

``System(scenario, design, policy, **params)`` is the transition system (shared by the
simulator and the checker); ``simulate()`` runs it once and returns an ``Outcome``.
"""

from faultline.model.simulate import simulate
from faultline.model.system import System

__all__ = ["System", "simulate"]
