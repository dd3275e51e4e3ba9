"""The academy (ACADEMY.md): the replay buffer every run appends to, policy versions, and the
nightly sessions that learn from the buffer.  Import-light: nothing here loads torch."""
