"""The replicated multi-topic queue: a state machine applied from a Raft log, its replica
and its client."""
