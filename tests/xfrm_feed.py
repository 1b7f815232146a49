"""For host tests: XfrmView.poll over the C index, fed kernel-format notifications (one
datagram each, as the kernel sends them) instead of a netlink socket."""
import collections

from ipsecchan.xfrm.index import Index
from ipsecchan.xfrm.monitor import XfrmView


class Feed:
    def __init__(self):
        self.datagrams = collections.deque()

    def read(self):
        return self.datagrams.popleft() if self.datagrams else None

    def close(self):
        pass


class FedView(XfrmView):
    """light: as the Latcher's own view (True) or with decoded events (False); dump: what
    the index holds at the start (a dump's bytes)."""

    def __init__(self, light: bool = True, dump: bytes = b""):
        self.index, self.resyncs, self.monitor, self.light = Index(), 0, Feed(), light
        if dump:
            self.index.apply(dump)

    def feed(self, *messages):
        self.monitor.datagrams.extend(messages)

    def wait(self, timeout):
        return bool(self.monitor.datagrams)
