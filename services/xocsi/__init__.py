"""xocsi, the operator CLI (like csc): every CSI RPC against an endpoint, and ``xocsi jobs`` over Redis and
RabbitMQ. Imports shared/ and the generated CSI stubs only, never a service's internals."""
