"""Running the stack locally as separate processes (brokers, simulator, frontends, migrators): used by the
demo, the e2e tests and the soak. Not part of a production deployment."""
