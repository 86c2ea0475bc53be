"""Operations on document text, in memory over a batch of documents: normalise, measure, filter
(each filter step counting what it removed) and hash for deduplication. Nothing here reads or
writes files or starts Ray tasks: the tasks of `data_pipeline.stages` run these over parts and
buckets."""
