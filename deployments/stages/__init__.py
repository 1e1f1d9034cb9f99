"""One Serve deployment per stage of a pipeline version (Embedder, Retriever, Generator, and the
Pipeline entry point that chains them), and the replica lifecycle they share: timed warm-up before
the first request, drain reporting, cleanup."""
