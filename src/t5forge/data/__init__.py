"""Pre-training and fine-tuning data: text sources, span corruption, resumable loaders, SNI."""
