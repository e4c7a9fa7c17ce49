"""`gptq-gateway up`: one command from a model to an OpenAI-compatible endpoint.

model_cache.py picks (and if needed quantizes, once) the checkpoint; processes.py runs
`gptq-gateway serve` and `gptq-gateway openai` as children and stops them in order;
gateway/cli_up.py ties them together and prints how to call the result.
"""
