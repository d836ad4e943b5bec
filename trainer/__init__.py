"""Training on Ray Train, in layers (each imports only those below it; pyproject's import-linter contract):

    finetune                      the finetuning CLI: pretrained, from scratch, or the MLP baseline
    train | baselines | logreg | naive_bayes
                                  the pretraining driver (Ray Train); the per-session decoders it is judged against
    loop                          what every worker runs, top to bottom
    build | progress              model, optimizer, schedule; log lines, timer, Ctrl-C, gather
    pretrained | report | sessions | tblog | testhooks
                                  grown vocabularies; accuracy lines and tables; session modalities;
                                  TensorBoard; the test-only hooks (an environment variable, no flag)
    evaluate | checkpoint         the evaluation pass; the train state on disk
    tally | presentations         metrics per modality, record and task (the Tally; the per-presentation headline);
                                  presentation-aligned features and the loop of the per-record decoders
    config                        TrainConfig and its command line (values: typecheck; files: strict_yaml)

The network itself lives in ``trainer.model`` and never imports these.
"""
