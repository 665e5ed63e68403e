"""Training-aware compression through TFMOT: pruning, weight clustering, fine-tuning, and the
verified Keras 3 → tf_keras bridge they need. All TFMOT work runs in a child process
(`tfmot_worker`), because importing TFMOT switches the whole process to legacy Keras."""
