"""The dev harness: the stack run locally as separate processes (brokers, XO simulator, frontends, migrators)
for the demo, the e2e tests, the soak and the benchmarks. Not shipped in the wheel; imported by nothing in
shared/ or services/."""
