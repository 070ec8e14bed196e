//! Token merging (ToMe bipartite soft matching) and token pruning. (Issue 7: in progress.)
