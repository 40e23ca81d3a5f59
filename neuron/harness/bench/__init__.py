"""`neuron bench`: run.py measures (model, axon, generation, validator, memory), load.py and gateway.py add their parts, vllm.py the vLLM engine; figure.py is what each figure is."""
