"""Online half: 4-bit kernels, the model runner, the engine, gRPC server and OpenAI shim."""
