"""Using a trained model: scoring in bounded memory, the two-stage shortlist, the retrieval metrics and
protocols, evaluation of checkpoints, and the one search path (`search.SearchEngine`) that `search`,
`serve` and the library share."""
