"""The exhaustive model checker: BFS over the model's transition system, safety and
liveness properties, shortest counterexamples, the design x policy matrix.

Layout (after Stateright's model/checker split): ``adapter`` turns a transition system into
successor lists with fairness classes, ``explorer`` builds the reachable graph, ``properties``
judges it, ``replay`` re-runs a counterexample by action names, ``matrix`` runs the cells in
parallel, ``cli`` is ``faultline check``, ``bench`` measures it.
"""

from faultline.check.explorer import Graph, explore
from faultline.check.properties import CheckResult, check_system
from faultline.check.replay import replay

__all__ = ["CheckResult", "Graph", "check_system", "explore", "replay"]
