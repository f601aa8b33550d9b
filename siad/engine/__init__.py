"""Running methods: the protocol and the evaluation loop."""
