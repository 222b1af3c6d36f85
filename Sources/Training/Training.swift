import ARModel
