"""milvus package of raee."""
