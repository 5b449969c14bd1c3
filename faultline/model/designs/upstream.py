"""upstream: KVM as merged. Every hook keeps its default (faultline/model/design.py):
the async PF worker's failed gup is ignored, page-ready is sent anyway, the task retries,
needs I/O again, and a new async PF starts: the guest loops and userspace is never told.
"""

from faultline.model.design import Design


class Upstream(Design):
    name = "upstream"
    summary = "KVM as merged: an async PF error is dropped (the guest retries forever)"


DESIGN = Upstream()
