"""Generated gRPC stubs for protos/freshrec/v1 (run `make proto`; never edit by hand)."""
