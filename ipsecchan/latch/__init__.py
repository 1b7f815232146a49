"""RFC 5660 connection latching: the sans-IO state machine and what it compares."""
from ipsecchan.latch.machine import (INPUTS, Alert, Block, Cause, Latch, LatchParams,
                                     LatchProtocolError, LatchRefused, LatchState, Observation,
                                     Party, Pin, Policy, Release, Requirements, SAFacts,
                                     conflict, evaluate)
from ipsecchan.latch.protection import Protection

__all__ = ["INPUTS", "Alert", "Block", "Cause", "Latch", "LatchParams", "LatchProtocolError",
           "LatchRefused", "LatchState", "Observation", "Party", "Pin", "Policy", "Protection",
           "Release", "Requirements", "SAFacts", "conflict", "evaluate"]
