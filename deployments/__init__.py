"""The Ray Serve side: the application builders (`app`), one thin adapter per pipeline stage (`stages`),
and the HTTP gateway with its knowledge-base manager (`gateway`). The logic lives in `rag` and in
plain services beside the adapters; what runs outside the cluster is in `control`."""
