"""Generation with several LoRAs: the engine (``engine.Generator``), samplers and PNG parameters (``samplers``),
A1111 prompt syntax (``prompt_syntax``)."""
