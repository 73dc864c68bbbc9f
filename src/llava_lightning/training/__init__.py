"""What is specific to training loops and strategies: stages (freezing), the token-mean loss, the
optimizer and schedule, the FSDP1 / FSDP2 / DeepSpeed strategies and everything that differs by
strategy, sharded init, checkpoint reading, consolidation and resume checks."""
