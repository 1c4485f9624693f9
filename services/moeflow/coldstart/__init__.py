"""Fast cold start of engine instances (issue 7): the five-step record, the node model store
(DRAM pre-load), the warm pool and the fork server. See docs/coldstart.md."""
