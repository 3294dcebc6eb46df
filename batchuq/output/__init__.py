"""The output: its paths checked up front, its schema and rows, and the sink that writes them.

* ``paths``: the output file or folder checked before any work;
* ``schema``: the Parquet schema, the rows as record batches, the run metadata read back;
* ``sink``: ``ParquetSink`` (atomic writing) and ``Checkpoint`` (``--resume``).

Nothing is imported here: ``from batchuq.output.paths import check_output_path`` stays cheap.
"""
