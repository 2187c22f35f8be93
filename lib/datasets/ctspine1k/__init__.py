"""The CTSpine1K release: IDs by source, the official split file, the release layout, Table 1.

Layout: ``{trainset,test_public,test_private}/{data,gt}/``, image ``ID.nii.gz``, mask
``ID_seg.nii.gz``, ``metadata_colonog.xlsx``, ``metadata_neck.xlsx``, ``readme.txt``,
``data_split.txt``.
"""
