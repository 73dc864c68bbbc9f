"""Training helpers: parameter tables and groups, the learning-rate schedule, the step-token look-ahead
(exact token-mean loss), and the FSDP1 / FSDP2 / DeepSpeed strategies."""
