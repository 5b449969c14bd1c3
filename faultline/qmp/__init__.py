"""A QMP monitor for faultline's VMM: the protocol QEMU's monitor speaks, on a Unix socket.

``protocol``: the wire format (JSON framing, requests, replies, errors, events) as in
QEMU's docs/interop/qmp-spec.rst. ``events``: faultline's event log translated into QMP
events. ``server``: the socket server, driving a run through :class:`control.VmControl`.
See docs/qmp.md.
"""
