import marshmallow as ma


class BlobOut(ma.Schema):
    sha256 = ma.fields.String(required=True)
    media_type = ma.fields.String(required=True)
    size_bytes = ma.fields.Integer(required=True)
    width = ma.fields.Integer(required=True)
    height = ma.fields.Integer(required=True)
    uploaded_at = ma.fields.AwareDateTime(required=True)
